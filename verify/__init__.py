"""verify: the address verification server (Postfix verify(8)); see service.py."""

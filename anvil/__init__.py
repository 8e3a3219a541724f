"""anvil: connection count and rate control for smtpd (Postfix anvil(8)); see service.py."""

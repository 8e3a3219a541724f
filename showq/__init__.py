"""showq: the mail queue listing on public/showq (Postfix showq(8)); see service.py."""

"""postscreen: the SMTP connection screen in front of smtpd (postscreen/service.py)."""

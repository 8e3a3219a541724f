"""metrics: the Prometheus/OpenMetrics endpoint of postfix-py; see service.py."""

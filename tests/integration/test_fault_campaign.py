"""The fault campaign, scaled to CI: mail under load while processes (the master too) are
SIGKILLed, the instance restarts, the queue file system fills up and the far end answers
4xx or stalls; every acknowledged message must arrive or bounce (tests/campaign.py).

The campaign's seed is printed (and is in every assertion's figures): CAMPAIGN_SEED=N
repeats a run's random choices."""

import os

import pytest

from campaign import run_campaign


@pytest.mark.skipif(os.geteuid() != 0, reason="the campaign runs chrooted workers: root")
def test_no_acknowledged_mail_is_lost():
    figures, _ = run_campaign(messages=300, clients=8, kill_interval=0.4, tls_fraction=0.3,
                              restart=True, duration=15.0, master_kills=2, disk_full=2.0,
                              tempfail=0.03, stall=0.005)
    print(figures)
    assert figures["acknowledged"] >= 150, figures
    assert figures["lost"] == [], figures
    assert figures["refused_but_delivered"] == [], figures
    assert figures["left_in_queue"] == 0, figures
    assert figures["restarts"] == 1, figures
    assert figures["kills"].get("master") == 2, figures
    assert figures["events"].get("disk full") == 1, figures
    assert sum(figures["kills"].values()) >= 10, figures
    assert set(figures["kills"]) >= {"smtpd", "smtp"}, figures
    # Every path was taken: relayed, delivered locally, submitted through pickup.
    assert figures["local"] > 0 and figures["via_pickup"] > 0, figures

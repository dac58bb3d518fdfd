"""HTTP out: one poller per provider that cannot push."""

"""The ClientApp: what each simulated or deployed hospital runs."""

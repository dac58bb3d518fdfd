"""HTTP in: SMSPilot callbacks and the operational routes."""

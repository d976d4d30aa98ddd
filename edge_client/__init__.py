"""The edge side: a draft model on the device, verified by the cloud's target."""

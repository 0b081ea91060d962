"""Training: the LightningModule and the train/resume entry points."""

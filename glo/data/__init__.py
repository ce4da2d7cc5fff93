"""Images and masks: folder, BSDS500 and sample datasets yielding (B,3,H,W) in [-1,1] with ids; hole
masks."""

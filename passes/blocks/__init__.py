"""The block route: a safetensors checkpoint pruned one decoder block at a time.

``driver`` walks the blocks and runs the pipeline's decisions on each (``choose.py``, the same
calibration, scoring, refit, shrink and verification code); ``checkpoint`` reads and writes
shards, ``onload`` moves one block's weights on and off the device, ``capture`` records what the
model hands its layers, ``hidden`` holds (or spills) the calibration hidden states. Nothing is imported here, so ``capture`` can
serve the in-memory sequential refit without loading the driver.
"""

"""Training of the shipped organisms (``vtc/organisms/shapes-*``): not part of the vtc distribution, run from the
repository root (``python -m training.organisms --help``)."""

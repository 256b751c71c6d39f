"""Training: the loop, the step math, optimizer/schedule, FLOPs/MFU."""

"""raypo: preference optimisation (MallowsPO, MixDPO, DPO family) on Ray Train + DeepSpeed."""

__version__ = "0.1.0"

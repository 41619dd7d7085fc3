"""Each accelerator's peak matrix rate, for MFU: one table, by the device_kind JAX reports."""

# Dense bfloat16 FLOP/s per JAX device (a v4 or v5p chip's two TensorCores are one megacore device),
# from the vendors' data sheets, keyed by jax.Device.device_kind exactly: "TPU v5" is v5p and
# "TPU v5 lite" v5e, so no name may stand for another that it begins. Others: TrainConfig.peak_flops.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}

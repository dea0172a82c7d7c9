"""Pure numerics of the StreamDiffusion method: no I/O, no device choice, no U-Net call.

``schedule`` (LCM timesteps and per-slot coefficients), ``guidance`` (RCFG row layouts and combination),
``similarity`` (the stochastic similarity filter), ``step`` (one denoising step as plan and apply) and ``image``
(frame ↔ tensor conversions and value ranges).
"""

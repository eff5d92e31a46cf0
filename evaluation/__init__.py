"""Evaluation: BrierLM of models and packages, package comparison, autoencoder reconstruction.

    brierlm.py         the likelihood-free estimator (numpy)
    settings.py        where a model is evaluated: `EvalSettings` and the positions they pick
    language_model.py  BrierLM of a CALM or AR model: a training checkpoint (the PyTorch reference)
                       or a package (its ONNX graphs), at the same positions and random streams
    package.py         `calm-edge eval package`: a package's quality as deployed
    compare.py         `calm-edge eval compare`: several packages of one model against their fp32 one
    autoencoder.py     `calm-edge eval autoencoder`: reconstruction and robustness of the latent space
"""

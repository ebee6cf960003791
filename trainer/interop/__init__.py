"""Our ViT's weights in other libraries' formats, both ways (NumPy only, except `export`).

    param_layout    our params in one canonical layout (unrolled layers, unfused projections)
    timm_format     timm's VisionTransformer names: model.safetensors + config.json
    npz_format      flat .npz: our documented names, or big_vision's ViT names
    weights_import  a timm / big_vision / our .npz file as a model's params (`init_params`, ...)
    export          `python -m trainer.interop.export`: a stage's export -> timm / npz / big_vision

Opening any model source (a stage's export dir or one of these files) is
`trainer.checkpoint.open_model`. Nothing is imported here: launch/dag.py reads `weights_import`
at plan time without JAX.
"""

"""The evaluate stage's metrics: pure NumPy functions, each with its definition in its docstring.

    accuracy.py        top-k, multi-label "any correct", ImageNet-ReaL
    ood.py             accuracy in another label space through data/label_maps (ImageNet-R/-A,
                       ObjectNet, JFT -> ImageNet, ...); ObjectNet's border crop
    model_vs_human.py  the model-vs-human toolbox's 16-class decisions, OOD accuracy, accuracy
                       difference, observed/error consistency (Cohen's kappa), shape bias, and its
                       raw-data CSV layout for the human reference
    calibration.py     expected calibration error and the reliability diagram's bins
    fairness.py        subgroup accuracy and gaps, demographic parity, randomized-threshold
                       debiasing (DP-constrained) and its accuracy-vs-epsilon frontier

They take host arrays (a model's scores over a split, its labels) and return floats or small
dicts; eval/evaluators.py turns each into an evaluator of the evaluate stage's table.
"""

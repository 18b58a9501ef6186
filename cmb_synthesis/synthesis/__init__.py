"""The mask-guided 3-D CycleGAN (paper section 2): networks, losses, training data, engines, metrics, inference.

- :mod:`~cmb_synthesis.synthesis.networks`: generators ``G_HP``/``G_PH`` (``CMBGenerator``), critics ``D_P``/``D_H``.
- :mod:`~cmb_synthesis.synthesis.losses`: ``L_CC``, ``L_ID``, ``L_AM``, ``L_GAN``, gradient penalty, objectives.
- :mod:`~cmb_synthesis.synthesis.data`: the lesion bank and ``CycleGANPatchDataset`` (healthy + pathological patches).
- :mod:`~cmb_synthesis.synthesis.engine`: ``CycleGANTrainer`` (critic and generator steps), ``SynthesisEvaluator``.
- :mod:`~cmb_synthesis.synthesis.metrics`: synthesis quality metrics (lesion contrast, identity error).
- :mod:`~cmb_synthesis.synthesis.realism`: per-lesion profiles and a real-vs-synthetic two-sample test.
- :mod:`~cmb_synthesis.synthesis.inference`: whole-volume painting / removal of CMBs on scans in a folder.
"""

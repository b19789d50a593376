"""Evaluation and prediction: a network over whole volumes (``inference``: slice batches, validation),
the metrics (``metrics``: Dice, Jaccard, HD95, ASD with medpy), the test scripts' core (``testing``)
and the model card every checkpoint carries (``model_card``).

Layer: above data, networks and the method; below training (which validates with it).
"""

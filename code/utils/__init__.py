"""The method's pieces (SSCD curriculum-loss utilities): small pure functions on tensors.
``sscd``: copy-paste boxes, SDA, HCA, Decouple, CGSR, the largest-component filter, the centre disc;
``losses``: Dice, masked cross-entropy, the mixed loss; ``ema``: the teacher's update.

Layer: imports nothing of this project but ``common``; the training engine calls these.
"""

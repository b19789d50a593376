"""Reporting for the experiment drivers and ``visualize.py``: result tables (``report``), learning
curves (``curves``) and figures of the method's intermediate maps (``visual``).

Layer: the highest package; nothing in ``code/`` but the scripts imports it.
"""

"""Data: reading and checking image files (``image_check``, ``volume_io``), the converters and
preprocessors that write the h5 layout (``convert_dataset``, ``conversion``, ``preprocess_acdc``,
``preprocess_promise12``, ``synthetic``), the slice index (``slice_index``), and the training data the
trainers read: in memory or from disk, batched and augmented (``dataset``, ``converted``, ``augment``).

Layer: above ``common`` only; never imports the method, networks, training, evaluation or reporting.
"""

"""Framework callbacks that send a training run's events to metricsd through ``metricsd.Emitter``.

One module per framework, each importing its framework when it is imported (and not before:
``import metricsd`` and ``import metricsd.integrations`` import none of them, nor torch):

- ``metricsd.integrations.lightning.MetricsdCallback``: PyTorch Lightning (``lightning.pytorch``,
  else ``pytorch_lightning``); extra ``metricsd[lightning]``.
- ``metricsd.integrations.transformers.MetricsdCallback`` (and its ``compute_metrics`` wrapper):
  Hugging Face ``transformers.Trainer``; extra ``metricsd[transformers]``.
- ``metricsd.integrations.keras.MetricsdCallback``: Keras 3 (any backend; tested with
  ``KERAS_BACKEND=torch``); extra ``metricsd[keras]``.

Common to all: pass an ``Emitter`` or let the callback create one from the ``METRICSD_*``
environment when training starts; the end of training sends ``run_end`` (closing the emitter,
unless it was given with ``close=False``); an exception inside a hook never reaches the training
loop: it is counted in ``callback.errors`` and logged once on the logger ``metricsd.integrations``.
"""

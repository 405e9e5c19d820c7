"""ReContrast anomaly detection: data, model, loss, training, evaluation, inference, plots."""
__version__ = "0.1.0"

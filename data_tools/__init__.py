"""Data side of effnet-tuner: ingest, the reference hash split, tf.data pipelines, demo data."""

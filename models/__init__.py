"""Keras/TensorFlow models: input pipeline, architectures, training, evaluation and export."""

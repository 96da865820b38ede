"""Train the reference MNIST CNN and export it as a versioned SavedModel.

Run ``python -m training.fit --help`` for the options.
"""

"""SavedModel: the builder (`build`: the signature `serving_default`, reproducible bytes).
`python -m export.savedmodel` is `__main__`.
"""

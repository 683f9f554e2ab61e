"""Metrics of generated samples, one file each: FID/IS with the ADM evaluator's InceptionV3 (evaluator.py,
inception.py, fid.py), precision/recall, the toy shapes' feature-net scores (toy_features.py) and S_cross, the
attention a group's images pay each other (s_cross.py).
"""

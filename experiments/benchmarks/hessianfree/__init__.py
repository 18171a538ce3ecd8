"""Hessian-free benchmark: vivitlib vs PyHessian vs curvlinops vs scipy eigsh."""

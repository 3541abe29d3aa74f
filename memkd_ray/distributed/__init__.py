"""Ray Train and Ray Tune: the only package that imports `ray`."""

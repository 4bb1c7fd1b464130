"""Quality evaluation behind `memdsl eval` (results of the shipped rules: benchmarks/QUALITY.md).

`tasks` (MQAR, S-NIAH, byte windows), `corpus` (the bundled text), `model` (the one small model
and the rule specs), `train` (training and scoring), `runner` (tables), `plots`. Nothing is
imported here, so `memdsl --help` stays fast.
"""

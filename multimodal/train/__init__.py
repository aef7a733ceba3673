"""The phase machinery of train_progressive.py: freezing, the step, start points and resume, the
checkpoint schema, optimisation, distribution, the epoch records, the forgetting guard and the reports."""

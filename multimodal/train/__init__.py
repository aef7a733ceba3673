"""The phase machinery of train_progressive.py: freezing, the step, start points and resume, the
checkpoint schema, optimisation, distribution, the forgetting monitor and its reports."""

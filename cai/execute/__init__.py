"""Running a plan: one decision per step (`decide`), the stage's context, the
measurements, a short loop (`executor.execute`)."""

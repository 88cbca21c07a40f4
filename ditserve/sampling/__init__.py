"""Pure schedules and solvers: no state outside the arguments."""

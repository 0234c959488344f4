"""``regionmed eval``: evaluation tasks found through a registry (:mod:`.tasks`, one module per
task), the datasets they score (:mod:`.suites`, opened once per run: :mod:`.context`), the run
(:mod:`.run`) and its report (:mod:`.report`)."""

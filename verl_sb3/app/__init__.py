"""The application: the training job (:mod:`~verl_sb3.app.training`), its settings
(:mod:`~verl_sb3.app.config`), recorder, evaluation targets, dashboard and command line
(``verl-sb3``, :mod:`~verl_sb3.app.cli`). The library it is built on is the rest of ``verl_sb3``."""

"""The campaign driver: the executor contract, workers, store, callbacks, tracking, selection and checks."""

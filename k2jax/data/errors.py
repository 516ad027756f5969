"""The one error type of the data layer: one line naming the file and the problem."""


class DataError(ValueError):
    pass

"""A node application with no hooks: the node only holds connections (business logic runs in workers)."""


class Quiet:
    pass


app = Quiet

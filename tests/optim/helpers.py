"""Helpers shared by the optimiser tests."""


def make_closure(opt, model, loss_fn, X, y):
    """The usual ``opt.step(closure)`` closure: zero grads, forward, backward."""

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    return closure

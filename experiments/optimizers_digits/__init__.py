"""SGD, Adam, constant- and bootstrap-damped Newton on the digits data set."""

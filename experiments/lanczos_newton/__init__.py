"""SGD, Adam, Gram-space and Lanczos damped Newton on digits: matched steps and time."""

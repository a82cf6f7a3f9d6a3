"""`tunepipe learning-curve`: how the test metric grows with the number of labelled examples."""

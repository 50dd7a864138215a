"""`make soak`: a long drain with faults on, and the service's memory over it (see __main__)."""

"""Put first on ``PYTHONPATH`` by ``atm run``; holds the ``sitecustomize`` it injects."""

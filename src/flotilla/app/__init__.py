"""The built-in Flower App (Message API): PyTorch CNN for 28x28 digits.

client_app.py stays thin (imports flwr and numpy only) and hands work to a
warm per-device trainer process when the device has one (trainer.py);
server_app.py runs FedAvg with central evaluation; task.py holds the model.
"""

"""secagg-numpy: ServerApp running FedAvg's fit rounds through Flower's SecAgg+ workflow."""

import numpy as np
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
                      initial_parameters=ndarrays_to_parameters([np.zeros(20)]))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=context.run_config["num-server-rounds"]),
                           strategy=strategy)
    fit_workflow = SecAggPlusWorkflow(num_shares=context.run_config["num-shares"],
                                      reconstruction_threshold=context.run_config["reconstruction-threshold"])
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)

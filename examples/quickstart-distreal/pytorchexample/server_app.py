"""pytorchexample: a Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr_distreal import count_macs, make_droppable
from flwr_distreal.serverapp import Distreal

from pytorchexample.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg for the configured rounds."""
    torch.manual_seed(0)
    model = Net()
    full_macs = count_macs(make_droppable(model, torch.zeros(1, 1, 8, 8)))
    strategy = Distreal(full_macs_per_sample=full_macs, fraction_train=context.run_config["fraction-train"],
                        batch_size=context.run_config["batch-size"], local_epochs=context.run_config["local-epochs"])
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        train_config=ConfigRecord({"lr": context.run_config["lr"]}),
        num_rounds=context.run_config["num-server-rounds"],
    )
    print("final train metrics:", result.train_metrics_clientapp.get(context.run_config["num-server-rounds"]))
    print("final evaluate metrics:", result.evaluate_metrics_clientapp.get(context.run_config["num-server-rounds"]))

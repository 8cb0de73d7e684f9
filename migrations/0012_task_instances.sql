-- keel schema 12: the instance that runs a task (R21, R38, R49; issue 13).
-- Append-only: never edit a released migration; add a new one instead.

-- With several instances on one store, a RUNNING task names the instance
-- that started it beside `boot_epoch` (that instance's start): recovery on
-- one instance interrupts only its own tasks of older starts and those of
-- instances whose heartbeat lease expired. NULL: run by a keel that has no
-- instance id (one node), recovered by the boot-epoch rule alone.
ALTER TABLE tasks ADD COLUMN instance TEXT;

"""Laws: conservation laws, the laws data augmentation creates, their automatic discovery and
counting."""
